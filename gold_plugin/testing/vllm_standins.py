"""Stand-ins for the vLLM 0.29 objects the vllm teacher backend touches, for CPU tests and demos.

They reproduce the data layout of vLLM 0.29.0 (read from the wheel's ``vllm/logprobs.py``,
``vllm/outputs.py``, ``vllm/v1/engine/logprobs.py`` and ``vllm/v1/sample/sampler.py``):

- ``RequestOutput.prompt_logprobs`` has one entry per prompt token; entry 0 is ``None`` (nothing
  predicts the first token).
- Entry p describes prompt token p: the engine gathers ``[actual token, top-1, ..., top-k]``
  (``k = prompt_logprobs``), with the actual token's rank (count of vocabulary log-probs ``>=`` its
  own) and ranks 1..k for the top-k. As a dict (``list[dict[int, Logprob]]``) an actual token that is
  also in the top-k collapses into one key, so a position holds k or k + 1 entries; as
  ``FlatLogprobs`` (``SamplingParams(flat_logprobs=True)``) every position holds exactly k + 1
  entries, the actual token first, duplicates kept.
- Log-probs are the float32 log-softmax of the raw logits (``logprobs_mode="raw_logprobs"``): no
  temperature. ``decoded_token`` is None when ``detokenize=False``.
- A prompt must be shorter than ``max_model_len`` (room for one generated token), and
  ``prompt_logprobs`` may not exceed ``max_logprobs`` (default 20).

:class:`StandInLLM` answers ``generate`` with a Hugging Face model on CPU, producing these objects,
and :func:`standin_vllm_modules` returns ``vllm``-named modules to put in ``sys.modules``.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from gold_plugin.alignment.types import ChatTokenizer


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


LogprobsOnePosition = dict[int, Logprob]


@dataclass
class FlatLogprobs(MutableSequence):
    """Positions stored as flat parallel lists; position i spans ``[start_indices[i], end_indices[i])``."""

    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def append(self, position: LogprobsOnePosition | None) -> None:
        entries = position or {}
        self.append_fast(
            list(entries),
            [e.logprob for e in entries.values()],
            [e.rank for e in entries.values()],
            [e.decoded_token for e in entries.values()],
        )

    def append_fast(self, token_ids, logprobs, ranks, decoded_tokens) -> None:
        self.start_indices.append(len(self.logprobs))
        for token_id, logprob, rank, decoded in zip(token_ids, logprobs, ranks, decoded_tokens):
            self.token_ids.append(token_id)
            self.logprobs.append(logprob)
            self.ranks.append(rank)
            self.decoded_tokens.append(decoded)
        self.end_indices.append(len(self.logprobs))

    def __len__(self) -> int:
        return len(self.start_indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            raise NotImplementedError("slicing is not used by the teacher backend")
        span = range(self.start_indices[index], self.end_indices[index])
        return {
            self.token_ids[i]: Logprob(self.logprobs[i], self.ranks[i], self.decoded_tokens[i]) for i in span
        }

    def __iter__(self) -> Iterator[LogprobsOnePosition]:
        for i in range(len(self)):
            yield self[i]

    def __setitem__(self, index, value) -> None:
        raise TypeError("FlatLogprobs is append-only")

    def __delitem__(self, index) -> None:
        raise TypeError("FlatLogprobs is append-only")

    def insert(self, index, value) -> None:
        raise TypeError("FlatLogprobs is append-only")


def create_prompt_logprobs(flat_logprobs: bool) -> FlatLogprobs | list:
    container: FlatLogprobs | list = FlatLogprobs() if flat_logprobs else []
    container.append(None)
    return container


def append_logprobs_for_next_position(
    container: FlatLogprobs | list,
    token_ids: list[int],
    logprobs: list[float],
    decoded_tokens: Sequence[str | None],
    rank: int,
    num_logprobs: int,
) -> None:
    """``token_ids``/``logprobs`` = [actual, top-1, ..., top-k]; ranks = [rank, 1, ..., k]."""
    ranks = [rank, *range(1, num_logprobs + 1)]
    if isinstance(container, FlatLogprobs):
        container.append_fast(token_ids, logprobs, ranks, decoded_tokens)
    else:  # a dict: an actual token inside the top-k keeps its first slot, the later value wins
        container.append(
            {t: Logprob(lp, r, d) for t, lp, r, d in zip(token_ids, logprobs, ranks, decoded_tokens)}
        )


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: float | None
    logprobs: Any
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class RequestOutput:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        prompt_logprobs: Any,
        outputs: list[CompletionOutput],
        finished: bool,
        **kwargs: Any,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.outputs = outputs
        self.finished = finished


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: list[int]
    prompt: str


@dataclass
class SamplingParams:
    """The fields of vLLM's ``SamplingParams`` that the teacher backend sets."""

    n: int = 1
    temperature: float = 1.0
    max_tokens: int | None = 16
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    flat_logprobs: bool = False
    detokenize: bool = True


class VLLMValidationError(ValueError):
    pass


class StandInLLM:
    """``vllm.LLM`` look-alike backed by a Hugging Face causal LM on CPU (prompt log-probs only).

    ``model`` is a loaded ``PreTrainedModel`` or a folder. Records every ``generate`` call in
    ``calls`` (prompts and sampling params) so tests can check what the teacher sent.
    """

    def __init__(
        self,
        model: PreTrainedModel | str,
        *,
        max_logprobs: int = 20,
        max_model_len: int | None = None,
        tokenizer: ChatTokenizer | None = None,
        **kwargs: Any,
    ) -> None:
        from transformers import AutoModelForCausalLM

        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        self.model = model.eval()
        self.max_logprobs = max_logprobs
        self.init_kwargs = dict(kwargs, tokenizer=tokenizer)
        max_len = max_model_len or model.config.max_position_embeddings
        self.model_config = types.SimpleNamespace(max_model_len=max_len, max_logprobs=max_logprobs)
        self.calls: list[tuple[list[Any], SamplingParams]] = []

    @torch.inference_mode()
    def generate(self, prompts: Any, sampling_params: SamplingParams | None = None, **kwargs: Any):
        params = sampling_params or SamplingParams()
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        self.calls.append((prompts, params))
        num = params.prompt_logprobs
        if num is not None and num > self.max_logprobs:
            raise VLLMValidationError(
                f"Requested prompt logprobs of {num}, which is greater than max allowed: {self.max_logprobs}"
            )
        outputs = []
        for request_index, prompt in enumerate(prompts):
            ids = list(prompt["prompt_token_ids"])
            if not ids:
                raise VLLMValidationError("The decoder prompt cannot be empty")
            if len(ids) >= self.model_config.max_model_len:
                raise VLLMValidationError(
                    f"The decoder prompt (length {len(ids)}) plus the number of requested output tokens "
                    f"(at least 1) is longer than the maximum model length of {self.model_config.max_model_len}."
                )
            input_ids = torch.tensor([ids])
            logits = self.model(input_ids=input_ids).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            prompt_logprobs = None
            if num is not None:
                prompt_logprobs = create_prompt_logprobs(params.flat_logprobs)
                k = logprobs.shape[-1] if num == -1 else num
                targets = torch.tensor(ids[1:])
                scores = logprobs[:-1]
                actual = scores.gather(-1, targets[:, None])
                ranks = (scores >= actual).sum(-1)
                top_values, top_ids = torch.topk(scores, k, dim=-1)
                all_ids = torch.cat([targets[:, None], top_ids], dim=1).to(torch.int32).tolist()
                all_lps = torch.cat([actual, top_values], dim=1).tolist()
                for pos in range(len(ids) - 1):
                    append_logprobs_for_next_position(
                        prompt_logprobs, all_ids[pos], all_lps[pos], [None] * (k + 1), int(ranks[pos]), k
                    )
            next_id = int(logprobs[-1].argmax())
            completion = CompletionOutput(0, "", [next_id], None, None, finish_reason="length")
            outputs.append(
                RequestOutput(str(request_index), None, ids, prompt_logprobs, [completion], finished=True)
            )
        return outputs


def standin_vllm_modules() -> dict[str, types.ModuleType]:
    """Modules named ``vllm``, ``vllm.inputs``, ``vllm.logprobs``, ``vllm.outputs`` holding the stand-ins,
    to install in ``sys.modules`` (e.g. with pytest's ``monkeypatch.setitem``)."""
    root = types.ModuleType("vllm")
    root.LLM = StandInLLM  # type: ignore[attr-defined]
    root.SamplingParams = SamplingParams  # type: ignore[attr-defined]
    root.TokensPrompt = TokensPrompt  # type: ignore[attr-defined]
    root.RequestOutput = RequestOutput  # type: ignore[attr-defined]
    root.CompletionOutput = CompletionOutput  # type: ignore[attr-defined]
    root.__version__ = "0.29.0-standin"  # type: ignore[attr-defined]
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = TokensPrompt  # type: ignore[attr-defined]
    logprobs = types.ModuleType("vllm.logprobs")
    for name in ("Logprob", "FlatLogprobs", "create_prompt_logprobs", "append_logprobs_for_next_position"):
        setattr(logprobs, name, globals()[name])
    outputs = types.ModuleType("vllm.outputs")
    outputs.RequestOutput = RequestOutput  # type: ignore[attr-defined]
    outputs.CompletionOutput = CompletionOutput  # type: ignore[attr-defined]
    root.inputs, root.logprobs, root.outputs = inputs, logprobs, outputs  # type: ignore[attr-defined]
    return {"vllm": root, "vllm.inputs": inputs, "vllm.logprobs": logprobs, "vllm.outputs": outputs}
